"""One way into the control schema (`refresh_control`): every read and write of it lives here.

The flow, the CLI and the API call these modules; nothing else formats SQL on the control
schema. One module per concern (webhooks, data-quality results, ...).
"""
