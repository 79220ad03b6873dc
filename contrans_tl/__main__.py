from contrans_tl.cli import main

raise SystemExit(main())
