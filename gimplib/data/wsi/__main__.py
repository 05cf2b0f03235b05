from gimplib.data.wsi.cli import main

raise SystemExit(main())
