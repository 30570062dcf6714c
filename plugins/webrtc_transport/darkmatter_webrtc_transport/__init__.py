"""WebRTC data channels between DarkMatter nodes, with HTTP fallback."""
