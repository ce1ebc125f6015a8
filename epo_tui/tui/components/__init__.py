"""Widgets of the Textual UI, one pane per module."""
