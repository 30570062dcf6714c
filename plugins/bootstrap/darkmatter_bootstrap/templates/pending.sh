#!/bin/sh
echo 'darkmatter-bootstrap: this node is still preparing its packages; try again in a few seconds.' >&2
exit 1
