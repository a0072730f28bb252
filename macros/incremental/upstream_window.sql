{#
    What an incremental model (configured with period_incremental_config) reads from upstream:
    the rebuilt periods' condition, or the first period start from refresh_start_date or the
    lookback from the model's watermark.
#}

{#
    The rows an incremental run of the current model (configured with
    period_incremental_config) reads from upstream, as a SQL condition on `filter_column`
    (rebuilt_periods_condition); logs the periods it rebuilds.
#}
{% macro incremental_window_filter(filter_column, as_utc_timestamp=false) -%}
    {{ return(rebuilt_periods_condition(filter_column, as_utc_timestamp, log_periods=true)) }}
{%- endmacro %}


{#
    First period start to rebuild, as a SQL literal; use inside is_incremental() of a model
    configured with period_incremental_config (its grain, period and watermark column come
    from there). as_utc_timestamp: compare a timestamp column (the UTC start of the first day).
    The start is refresh_start_date when set, else var lookback_days before the watermark.
#}
{% macro incremental_window_start(as_utc_timestamp=false, log_start=true) -%}
    {%- set datetime = modules.datetime -%}
    {%- set everything = datetime.date(1, 1, 1) -%}
    {#- At parse time config.meta_get answers nothing; the SQL is not run then. -#}
    {%- if not execute -%}
        {{ return(window_literal(everything, as_utc_timestamp)) }}
    {%- endif -%}
    {%- set window = config.meta_get('incremental_window') -%}
    {%- if not window -%}
        {{ exceptions.raise_compiler_error(
            "incremental_window_start: configure " ~ this ~ " with period_incremental_config"
        ) }}
    {%- endif -%}
    {%- set watermark_column = window.get('watermark') or window.column -%}

    {%- set requested = refresh_start_date() -%}
    {%- if requested is not none -%}
        {%- set start = datetime.datetime.strptime(requested, '%Y-%m-%d').date() -%}
        {%- set reason = 'refresh_start_date ' ~ requested -%}
    {%- else -%}
        {%- set lookback_days = var('lookback_days', 60) | string | trim -%}
        {%- if not lookback_days.isdigit() -%}
            {{ exceptions.raise_compiler_error(
                "var lookback_days must be a whole number of days, got '" ~ lookback_days ~ "'"
            ) }}
        {%- endif -%}
        {#- The newest week lies in the newest period: read it through the period column's
            index instead of scanning the whole table for max(watermark). -#}
        {%- set watermark_sql -%}
            select max({{ watermark_column }}) as watermark
            from {{ this }}
            {%- if watermark_column != window.column %}
            where {{ window.column }} = (select max({{ window.column }}) from {{ this }})
            {%- endif %}
        {%- endset -%}
        {%- set watermark = run_query(watermark_sql).columns[0].values()[0] -%}
        {%- if watermark is none -%}
            {%- if log_start -%}
                {{ log(this.identifier ~ ": target is empty, rebuilding everything", info=true) }}
            {%- endif -%}
            {{ return(window_literal(everything, as_utc_timestamp)) }}
        {%- endif -%}
        {%- set watermark = datetime.date(watermark.year, watermark.month, watermark.day) -%}
        {%- set start = watermark - datetime.timedelta(days=lookback_days | int) -%}
        {%- set reason = lookback_days ~ ' days before max(' ~ watermark_column ~ ') ' ~ watermark -%}
    {%- endif -%}

    {%- set start = widen_window_start(start, window.grain, window.period) -%}
    {%- if log_start -%}
        {{ log(this.identifier ~ ": incremental window starts at " ~ start ~ " (" ~ reason ~ ")", info=true) }}
    {%- endif -%}
    {{ return(window_literal(start, as_utc_timestamp)) }}
{%- endmacro %}
