from dba_ray.cli import main

raise SystemExit(main())
