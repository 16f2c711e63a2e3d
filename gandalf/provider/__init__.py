"""provider layer."""
