"""The HTTP listeners: routes, admin and public sides, exposure checks."""
