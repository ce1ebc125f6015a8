"""The UI's modal screens, one module each kind: prompts (edit and inject, the scratchpad, an elite token
by token), the sessions browser, the search settings form, a latent's note, the help screen. The panes
of the main screen are in `epo_tui.tui.components`."""
