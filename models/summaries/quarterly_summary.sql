{{ config(**period_incremental_config('period_start', ['period_start', 'search_query', 'asin'])) }}

{{ summarize_search_query_performance('quarter') }}
