"""Starting tether: the demo driver and process supervision (shell scripts live beside it)."""
