"""The offline demo pack: a small English GPT-2 trained here, built by `python -m epo_tui.demo.build`."""
