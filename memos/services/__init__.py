"""Services: plain classes that own a transaction each. Routes and scheduler jobs call these."""
