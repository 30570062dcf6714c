"""Essential built-in plugins: always loaded, cannot be disabled."""
