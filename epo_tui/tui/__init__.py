"""The Textual UI: it never imports the engine (DESIGN.md §2)."""
