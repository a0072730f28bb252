{{ config(**summary_config('quarter')) }}

{{ summarize_search_query_performance('quarter') }}
