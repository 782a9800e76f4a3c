"""Plain helpers every step shares: errors and their causes, labels, running an external tool."""
