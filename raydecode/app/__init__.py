"""Entry points: the ``raydecode`` command (``cli``), ``raydecode submit`` (``submit``), ``make demo`` (``demo``)
and the local development stack (``devstack``). The library below never imports them."""
