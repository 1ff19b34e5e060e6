from backpack_vault.cli import main

raise SystemExit(main())
