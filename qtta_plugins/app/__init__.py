"""The application around the library: the ``qtta`` command (:mod:`.cli`), ``qtta demo``'s
per-corruption table (:mod:`.demo`) and its tour of the three methods (:mod:`.tour`). The library
(the verbs, the view, the methods, the adapters' hooks) never imports from here."""
