{{ config(**summary_config('week')) }}

{{ summarize_search_query_performance('week') }}
