"""Every figure and HTML drawing of nbcompress results (the engine returns data only)."""
