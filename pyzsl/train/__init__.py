"""Training: ``python -m pyzsl.train <method>`` with methods lesa, tfvaegan and clswgan. Shared run machinery is in
:mod:`pyzsl.train.runner`."""
