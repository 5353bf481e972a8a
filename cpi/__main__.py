from cpi.main import main

raise SystemExit(main())
