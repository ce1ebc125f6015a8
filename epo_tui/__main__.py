from epo_tui.cli import main

raise SystemExit(main())
