from gandalf.cli import main

raise SystemExit(main())
