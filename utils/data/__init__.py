"""Notebook 01's data preparation, a module per stage: ``sources``, ``filters``, ``template``, ``pipeline``, ``stats``,
``output`` (the folder written), ``prepared`` (the cache a run trains on); ``utils.prepare_data``: the command line."""
