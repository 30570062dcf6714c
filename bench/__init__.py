"""The DarkMatter bench suite (see bench/README.md): ``python -m bench [--quick] [--only NAME]``."""
