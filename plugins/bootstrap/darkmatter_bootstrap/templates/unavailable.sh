#!/bin/sh
echo 'darkmatter-bootstrap: packages are unavailable: this node could not package the DarkMatter kernel and its plugins (its operator finds the reason in the node log).' >&2
exit 1
