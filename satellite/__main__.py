from satellite.cli import main

raise SystemExit(main())
