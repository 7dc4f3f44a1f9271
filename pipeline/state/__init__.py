"""Keeping state: the answer store (store, its migrations, the local AnswerStore in answers), the job folder
(jobdir) and what `pipeline status` reads from them."""
