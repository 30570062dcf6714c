import sys
sys.exit('darkmatter-bootstrap: packages are unavailable: this node could not package the DarkMatter kernel and its plugins.')
