from lrra.cli import main

raise SystemExit(main())
