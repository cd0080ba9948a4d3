"""Proto package `dyspec` (the wire contract's namespace, not the algorithm package of the same name)."""
