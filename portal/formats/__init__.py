"""Date formats of the portal's one language (FORMAT_MODULE_PATH): ISO dates with the zone, in admin as in the
portal's own pages. Django's own English formats ("Dec. 6, 2026, 9:49 p.m.") would win over plain settings."""
