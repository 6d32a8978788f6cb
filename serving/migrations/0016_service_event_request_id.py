from django.db import migrations, models


class Migration(migrations.Migration):
    # 0015 is another branch's: when both are merged, this one depends on 0015 instead.
    dependencies = [
        ("serving", "0015_node_unavailable"),
    ]

    operations = [
        migrations.AddField(
            model_name="serviceevent",
            name="request_id",
            field=models.CharField(blank=True, db_index=True, default="", max_length=128),
        ),
    ]
