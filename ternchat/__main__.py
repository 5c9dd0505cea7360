from ternchat.cli import main

raise SystemExit(main())
