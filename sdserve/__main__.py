from sdserve.cli import main

raise SystemExit(main())
