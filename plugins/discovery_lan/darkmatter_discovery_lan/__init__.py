"""Discover DarkMatter nodes on the LAN by UDP multicast beacons."""
