"""Pipeline parallelism: which layers each stage holds (`layout`), the stage modules cut from one
GPTModel (`stage`), and the schedules that run micro-batches through them (`schedules`)."""
