import sys
sys.exit('darkmatter-bootstrap: this node is still preparing its packages; try again.')
