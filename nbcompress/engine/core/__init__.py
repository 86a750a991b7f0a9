"""What every verb stands on: history and undo, layers, argument checks, summaries, reports."""
