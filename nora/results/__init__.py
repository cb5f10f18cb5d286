"""Tables and figures generated from run directories (never by re-training)."""
