"""``backpack-vault dev`` and the OpenBao dev launcher; imported only by ``cli``."""
