"""REST API of the access service (mounted at ``api/access/``)."""
