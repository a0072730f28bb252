{{ config(**summary_config('year')) }}

{{ summarize_search_query_performance('year') }}
