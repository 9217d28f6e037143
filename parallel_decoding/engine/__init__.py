"""The method: skeleton, branches in one sequence, merge; normal and parallel decoding of one answer."""
