{{ config(**summary_config('month')) }}

{{ summarize_search_query_performance('month') }}
