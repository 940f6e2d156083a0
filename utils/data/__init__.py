"""Notebook 01's data preparation, a module per stage: ``sources``, ``filters``, ``template``, ``pipeline``, ``stats``,
``prepared`` (the folder written, and the cache a run trains on); ``utils.prepare_data`` is the command line."""
