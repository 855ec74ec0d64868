"""The job's life after submission: its files in storage, its endings, its playlist and segments, its webhooks, keepalive and holds."""
