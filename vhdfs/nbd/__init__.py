"""NBD front end: nbdkit serves, vhdfs is its Python plugin (``plugin.py`` over ``backend.py``);
``serve.py`` starts and supervises nbdkit for ``vhdfs serve``. Neither trio nor pyfuse3."""
