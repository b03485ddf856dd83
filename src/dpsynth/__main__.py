from dpsynth.app.cli import main

raise SystemExit(main())
