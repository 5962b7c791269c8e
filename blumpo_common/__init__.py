"""Code both services share: configuration, the server bootstrap, errors, pagination."""
