using AnyPrecML.AI;
using AnyPrecML.Onnx;
using AnyPrecML.Tokenization;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.Caching.Distributed;
using Microsoft.Extensions.Caching.Memory;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Options;

namespace AnyPrecML.Tests;

[TestClass]
public sealed class ChatClientTests
{
    private const int MaxTokens = 40;
    private static ChatFixture _fixture = null!;
    private static AnyPrecisionChatClient _client = null!;
    private static string _cli3 = null!, _cli8 = null!;

    [ClassInitialize]
    public static void QuantizeOnce(TestContext _)
    {
        _fixture = new ChatFixture();
        _client = new AnyPrecisionChatClient(_fixture.ModelDirectory);
        _cli3 = _fixture.Generate(3, MaxTokens);
        _cli8 = _fixture.Generate(8, MaxTokens);
    }

    [ClassCleanup]
    public static void Cleanup()
    {
        _client.Dispose();
        _fixture.Dispose();
    }

    private static ChatMessage[] User(string text) => [new(ChatRole.User, text)];

    /// <summary>Tokens of the prompt as the generator counts them: the tokenizer's ids with one BOS.</summary>
    private static int PromptTokens(string prompt)
    {
        var ids = LlamaTokenizerLoader.Load(_client.Engine.Model.Checkpoint).EncodeToIds(prompt);
        return ids.Count > 0 && ids[0] == 1 ? ids.Count : ids.Count + 1;
    }

    /// <summary>Forward passes the engine ran since <paramref name="kernelCalls"/>: four bitplane nodes per block each (q,k,v fused; o; gate,up fused; down).</summary>
    private static long Forwards(long kernelCalls) => (_client.Engine.Operator.KernelCalls - kernelCalls) / (4 * _client.Engine.Config.Layers);

    [TestMethod]
    public async Task GreedyChatAtTwoWidthsMatchesAnyprecGenerate()
    {
        Assert.AreNotEqual(_cli3, _cli8, "3 and 8 bits should differ, or the test cannot tell widths apart");
        // Width by model id, and by the bits property.
        var at3 = await _client.GetResponseAsync(User(ChatFixture.Prompt), new ChatOptions { ModelId = "stories260K@3bit", MaxOutputTokens = MaxTokens });
        var at8 = await _client.GetResponseAsync(User(ChatFixture.Prompt), new ChatOptions { MaxOutputTokens = MaxTokens, AdditionalProperties = new() { ["bits"] = 8 } });
        Assert.AreEqual(_cli3, at3.Text);
        Assert.AreEqual(_cli8, at8.Text);
        Assert.AreEqual("stories260K@3bit", at3.ModelId);
        Assert.AreEqual("stories260K@8bit", at8.ModelId);
        Assert.AreEqual(ChatFinishReason.Length, at3.FinishReason);
        Assert.AreEqual(PromptTokens(ChatFixture.Prompt), at3.Usage!.InputTokenCount);
        Assert.AreEqual(MaxTokens, at3.Usage.OutputTokenCount);
        Assert.AreEqual(at3.Usage.InputTokenCount + MaxTokens, at3.Usage.TotalTokenCount);

        var updates = new List<ChatResponseUpdate>();
        await foreach (var u in _client.GetStreamingResponseAsync(User(ChatFixture.Prompt), new ChatOptions { ModelId = "stories260K@3bit", MaxOutputTokens = MaxTokens }))
            updates.Add(u);
        Assert.IsGreaterThan(5, updates.Count, "streaming should come in pieces");
        Assert.AreEqual(_cli3, string.Concat(updates.Select(u => u.Text)));
        var streamed = updates.ToChatResponse();
        Assert.AreEqual(_cli3, streamed.Text);
        Assert.AreEqual(ChatFinishReason.Length, streamed.FinishReason);
        Assert.AreEqual(MaxTokens, streamed.Usage!.OutputTokenCount);
    }

    /// <summary>
    /// Six requests at once, three at 3 bits and three at 8: each gets the text `anyprec generate` gives for its width,
    /// and their decode steps ran in shared passes (more steps than passes).
    /// </summary>
    [TestMethod]
    public async Task ConcurrentRequestsShareDecodePassesAndKeepTheirText()
    {
        long passes = _client.Batching.Batches, steps = _client.Batching.BatchedSteps;
        int[] widths = [3, 8, 3, 8, 3, 8];
        var responses = await Task.WhenAll(widths.Select(b => Task.Run(() =>
            _client.GetResponseAsync(User(ChatFixture.Prompt), new ChatOptions { ModelId = $"stories260K@{b}bit", MaxOutputTokens = MaxTokens }))));
        for (int i = 0; i < widths.Length; i++) Assert.AreEqual(widths[i] == 3 ? _cli3 : _cli8, responses[i].Text, $"request {i} at {widths[i]} bits");
        Assert.AreEqual(16, _client.Batching.MaxBatch);
        Assert.IsLessThan(_client.Batching.BatchedSteps - steps, _client.Batching.Batches - passes, "some passes ran several requests' steps");
    }

    /// <summary>A conversation's second turn reuses the first turn's keys and values and still gives a fresh client's text.</summary>
    [TestMethod]
    public async Task ANextTurnReusesTheConversationsCacheAndKeepsTheText()
    {
        using var fresh = new AnyPrecisionChatClient(_fixture.ModelDirectory, new AnyPrecisionChatClientOptions { PromptCacheEntries = 0, MaxBatch = 1 });
        Assert.IsNull(fresh.PromptCacheOf(3));
        var cache = _client.PromptCacheOf(3)!;
        Assert.AreEqual(4, cache.MaxEntries);
        var options = new ChatOptions { ModelId = "stories260K@3bit", MaxOutputTokens = 12 };
        List<ChatMessage> conversation = [new(ChatRole.User, "Lily and Tom went to the park.")];
        var first = await _client.GetResponseAsync(conversation, options);
        conversation.Add(new ChatMessage(ChatRole.Assistant, first.Text));
        conversation.Add(new ChatMessage(ChatRole.User, "Then they went home."));
        long reused = cache.ReusedTokens;
        var second = await _client.GetResponseAsync(conversation, options);
        Assert.IsGreaterThanOrEqualTo(reused + 8, cache.ReusedTokens, "the first turn's tokens were not prefilled again");
        Assert.AreEqual((await fresh.GetResponseAsync(conversation, options)).Text, second.Text);
        Assert.ThrowsExactly<UnknownModelException>(() => _client.PromptCacheOf(9));
    }

    [TestMethod]
    public async Task DraftBitsPropertyDecodesSpeculativelyWithTheTargetsGreedyText()
    {
        // Self-speculative decoding from the same parent: greedy output is the 8-bit model's, token for token.
        var plain = await _client.GetResponseAsync(User(ChatFixture.Prompt), new ChatOptions { ModelId = "stories260K@8bit", MaxOutputTokens = MaxTokens });
        var drafted = await _client.GetResponseAsync(User(ChatFixture.Prompt), new ChatOptions
        {
            ModelId = "stories260K@8bit", MaxOutputTokens = MaxTokens,
            AdditionalProperties = new() { [AnyPrecisionChatClient.DraftBitsProperty] = 4, [AnyPrecisionChatClient.DraftTokensProperty] = 3 },
        });
        Assert.AreEqual(_cli8, plain.Text);
        Assert.AreEqual(plain.Text, drafted.Text);
        var e = await Assert.ThrowsExactlyAsync<ArgumentException>(() => _client.GetResponseAsync(User(ChatFixture.Prompt),
            new ChatOptions { ModelId = "stories260K@4bit", AdditionalProperties = new() { [AnyPrecisionChatClient.DraftBitsProperty] = 4 } }));
        StringAssert.Contains(e.Message, "draft_bits");
    }

    [TestMethod]
    public async Task SampledChatFollowsTheSeedLikeGenerate()
    {
        var (code, output, err) = Cli.Run("generate", "--model", _fixture.ModelDirectory, "--bits", "4", "--prompt", ChatFixture.Prompt,
            "--max-tokens", "30", "--temperature", "0.9", "--top-k", "20", "--top-p", "0.95", "--seed", "42", "--json");
        Assert.AreEqual(0, code, err);
        string expected = System.Text.Json.JsonDocument.Parse(output).RootElement.GetProperty("text").GetString()!;
        var options = new ChatOptions { ModelId = "stories260K@4bit", MaxOutputTokens = 30, Temperature = 0.9f, TopK = 20, TopP = 0.95f, Seed = 42 };
        Assert.AreEqual(expected, (await _client.GetResponseAsync(User(ChatFixture.Prompt), options)).Text);
        var other = (await _client.GetResponseAsync(User(ChatFixture.Prompt), new ChatOptions { ModelId = "stories260K@4bit", MaxOutputTokens = 30, Temperature = 0.9f, TopK = 20, TopP = 0.95f, Seed = 7 })).Text;
        Assert.AreNotEqual(expected, other, "another seed should give another story");
    }

    [TestMethod]
    public async Task StopSequencesCutTheTextStreamedOrNot()
    {
        // The 3-bit story names Lily; stopping there leaves the text before it (cut mid-token: "Lily" is several tokens).
        int at = _cli3.IndexOf("Lily", StringComparison.Ordinal);
        Assert.IsGreaterThan(0, at);
        var options = new ChatOptions { ModelId = "stories260K@3bit", MaxOutputTokens = MaxTokens, StopSequences = ["Lily", "never appears"] };
        var response = await _client.GetResponseAsync(User(ChatFixture.Prompt), options);
        Assert.AreEqual(_cli3[..at], response.Text);
        Assert.AreEqual(ChatFinishReason.Stop, response.FinishReason);
        Assert.IsLessThan(MaxTokens, response.Usage!.OutputTokenCount!.Value);
        var streamed = new List<string>();
        await foreach (var u in _client.GetStreamingResponseAsync(User(ChatFixture.Prompt), options)) streamed.Add(u.Text);
        Assert.AreEqual(_cli3[..at], string.Concat(streamed), "no piece of the stop sequence may leak out while it is held back");
    }

    [TestMethod]
    public async Task CancellingStopsGenerationBetweenTokens()
    {
        using var cts = new CancellationTokenSource();
        long before = _client.Engine.Operator.KernelCalls;
        int pieces = 0;
        await Assert.ThrowsAsync<OperationCanceledException>(async () =>
        {
            await foreach (var u in _client.GetStreamingResponseAsync(User(ChatFixture.Prompt), new ChatOptions { MaxOutputTokens = 400 }, cts.Token))
                if (++pieces == 3) cts.Cancel();
        });
        // The generator runs at most a few tokens ahead of the reader, so it stopped near the third piece.
        Assert.IsLessThan(20, Forwards(before), "generation should stop between tokens once cancelled");
        // Stopping reading stops it too.
        before = _client.Engine.Operator.KernelCalls;
        await foreach (var u in _client.GetStreamingResponseAsync(User(ChatFixture.Prompt), new ChatOptions { MaxOutputTokens = 400 }))
            break;
        Assert.IsLessThan(20, Forwards(before));
    }

    [TestMethod]
    public async Task BadRequestsAreRefusedNamingTheProblem()
    {
        async Task<string> Refused(ChatOptions options, string prompt = ChatFixture.Prompt) =>
            (await Assert.ThrowsAsync<ArgumentException>(() => _client.GetResponseAsync(User(prompt), options))).Message;
        StringAssert.Contains(await Refused(new ChatOptions { ModelId = "llama@3bit" }), "unknown model 'llama@3bit'");
        await Assert.ThrowsExactlyAsync<UnknownModelException>(() => _client.GetResponseAsync(User("a"), new ChatOptions { ModelId = "stories260K@9bit" }));
        StringAssert.Contains(await Refused(new ChatOptions { ModelId = "stories260K@9bit" }), "3..8");
        StringAssert.Contains(await Refused(new ChatOptions { AdditionalProperties = new() { ["bits"] = 2 } }), "bits 2");
        StringAssert.Contains(await Refused(new ChatOptions { ModelId = "stories260K@3bit", AdditionalProperties = new() { ["bits"] = 4 } }), "different widths");
        StringAssert.Contains(await Refused(new ChatOptions { MaxOutputTokens = -1 }), "max tokens");
        StringAssert.Contains(await Refused(new ChatOptions { TopP = 0 }), "top-p");
        string longPrompt = string.Concat(Enumerable.Repeat("Once upon a time there was a cat. ", 100));
        StringAssert.Contains(await Refused(new ChatOptions(), longPrompt), "context is 512");
    }

    [TestMethod]
    public async Task DependencyInjectionPipelineWithCachingMiddleware()
    {
        var services = new ServiceCollection();
        int calls = 0;
        services.AddAnyPrecisionChatClient(_fixture.ModelDirectory, o => o.DefaultBits = 3)
            .UseDistributedCache(new MemoryDistributedCache(Options.Create(new MemoryDistributedCacheOptions())))
            .Use((messages, options, next, ct) => { Interlocked.Increment(ref calls); return next(messages, options, ct); });
        await using var provider = services.BuildServiceProvider();
        var chat = provider.GetRequiredService<IChatClient>();
        Assert.IsNotInstanceOfType<AnyPrecisionChatClient>(chat, "the registered client should be the middleware pipeline");

        var engine = chat.GetService<OnnxEngine>()!;
        long before = engine.Operator.KernelCalls;
        var first = await chat.GetResponseAsync(User(ChatFixture.Prompt), new ChatOptions { MaxOutputTokens = MaxTokens });
        long afterFirst = engine.Operator.KernelCalls;
        var second = await chat.GetResponseAsync(User(ChatFixture.Prompt), new ChatOptions { MaxOutputTokens = MaxTokens });
        Assert.AreEqual(_cli3, first.Text, "DefaultBits = 3 with no model id");
        Assert.AreEqual(_cli3, second.Text);
        Assert.IsGreaterThan(before, afterFirst);
        Assert.AreEqual(afterFirst, engine.Operator.KernelCalls, "the second call should come from the cache, not the engine");
        Assert.AreEqual(1, calls, "the cache sits in front of the counting middleware");

        var metadata = chat.GetService<ChatClientMetadata>()!;
        Assert.AreEqual("AnyPrecML", metadata.ProviderName);
        Assert.AreEqual("stories260K@3bit", metadata.DefaultModelId);
        var ours = chat.GetService<AnyPrecisionChatClientMetadata>()!;
        Assert.AreEqual("plain", ours.Template.Name);
        Assert.AreEqual("none", ours.TemplateSource);
        CollectionAssert.AreEqual(new[] { 3, 4, 5, 6, 7, 8 }, ours.SupportedBits.ToArray());
        Assert.AreEqual(512, ours.ContextLength);
    }

    [TestMethod]
    public async Task TemplateFromTokenizerConfigShapesThePrompt()
    {
        // A copy of the model with a ChatML template (Qwen's) beside it: detected, reported, and applied.
        using var dir = TestData.NewTempDir();
        string copy = Path.Combine(dir.Path, "stories260K");
        Directory.CreateDirectory(copy);
        foreach (string f in Directory.GetFiles(_fixture.ModelDirectory)) File.Copy(f, Path.Combine(copy, Path.GetFileName(f)));
        File.WriteAllText(Path.Combine(copy, "tokenizer_config.json"), System.Text.Json.JsonSerializer.Serialize(new { chat_template = Templates.ChatML, eos_token = "<|im_end|>" }));
        using var client = new AnyPrecisionChatClient(copy);
        Assert.AreEqual("chatml", client.Metadata.Template.Name);
        Assert.AreEqual("tokenizer_config.json", client.Metadata.TemplateSource);

        const string prompt = "<|im_start|>system\nTell a story.<|im_end|>\n<|im_start|>user\nOnce upon a time<|im_end|>\n<|im_start|>assistant\n";
        string expected = _fixture.Generate(5, 20, prompt);
        var response = await client.GetResponseAsync([new(ChatRole.System, "Tell a story."), new(ChatRole.User, "Once upon a time")], new ChatOptions { ModelId = "stories260K@5bit", MaxOutputTokens = 20 });
        Assert.AreEqual(expected, response.Text);

        using var chosen = new AnyPrecisionChatClient(copy, new AnyPrecisionChatClientOptions { ChatTemplate = "zephyr" });
        Assert.AreEqual("zephyr", chosen.Metadata.Template.Name);
        Assert.AreEqual("options", chosen.Metadata.TemplateSource);
    }

    [TestMethod]
    public void QuantizingAHuggingFaceModelKeepsItsChatTemplate()
    {
        // A Hugging Face directory with a Llama 2 chat template: quantize copies tokenizer_config.json, the client detects it.
        using var dir = TestData.NewTempDir();
        var (code, _, err) = Cli.Run("convert", "--model", TestData.Stories260K, "--output", dir["hf"]);
        Assert.AreEqual(0, code, err);
        File.WriteAllText(Path.Combine(dir["hf"], "tokenizer_config.json"), System.Text.Json.JsonSerializer.Serialize(new { chat_template = Templates.Llama2 }));
        using (var source = Models.LlamaCheckpoint.Open(dir["hf"]))
            Quantization.AnyPrecisionQuantizer.Quantize(source, dir["ap"], new Quantization.UniformSensitivity(), new Quantization.QuantizerOptions());
        Assert.IsTrue(File.Exists(Path.Combine(dir["ap"], "tokenizer_config.json")));
        using var client = new AnyPrecisionChatClient(dir["ap"], new AnyPrecisionChatClientOptions { ModelName = "tiny" });
        Assert.AreEqual("llama2", client.Metadata.Template.Name);
        Assert.AreEqual("tokenizer_config.json", client.Metadata.TemplateSource);
        Assert.AreEqual("tiny@8bit", client.GetService<ChatClientMetadata>()!.DefaultModelId);
    }
}

/// <summary>The <c>chat_template</c>s of real models' tokenizer_config.json (as published on the Hugging Face hub).</summary>
internal static class Templates
{
    public const string Llama2 = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";
    public const string Llama3 = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";
    public const string ChatML = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    public const string Zephyr = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";
}

[TestClass]
public sealed class ChatTemplateTests
{
    private static readonly ChatMessage[] Conversation =
    [
        new(ChatRole.System, "Be brief."),
        new(ChatRole.User, "Hi"),
        new(ChatRole.Assistant, "Hello."),
        new(ChatRole.User, "Tell a story"),
    ];

    [TestMethod]
    public void RealTemplatesAreRecognisedByFamily()
    {
        Assert.AreSame(ChatTemplate.Llama2, ChatTemplate.Detect(Templates.Llama2));
        Assert.AreSame(ChatTemplate.Llama3, ChatTemplate.Detect(Templates.Llama3));
        Assert.AreSame(ChatTemplate.ChatML, ChatTemplate.Detect(Templates.ChatML));
        Assert.AreSame(ChatTemplate.Zephyr, ChatTemplate.Detect(Templates.Zephyr));
        Assert.AreSame(ChatTemplate.Plain, ChatTemplate.Detect(null));
        Assert.ThrowsExactly<NotSupportedException>(() => ChatTemplate.Detect("{% for m in messages %}{{ m['content'] }}<sep>{% endfor %}"));
        Assert.AreSame(ChatTemplate.Zephyr, ChatTemplate.Named("Zephyr"));
        StringAssert.Contains(Assert.ThrowsExactly<ArgumentException>(() => ChatTemplate.Named("vicuna")).Message, "llama2, llama3, chatml, zephyr");
    }

    [TestMethod]
    public void EachFamilyWritesTheConversationAsItsJinjaDoes()
    {
        // Expected strings: the Jinja templates above rendered by hand (BOS left to the generator).
        Assert.AreEqual("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Tell a story [/INST]", ChatTemplate.Llama2.Format(Conversation));
        Assert.AreEqual("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            + "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nTell a story<|eot_id|>"
            + "<|start_header_id|>assistant<|end_header_id|>\n\n", ChatTemplate.Llama3.Format(Conversation));
        Assert.AreEqual("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
            + "<|im_start|>user\nTell a story<|im_end|>\n<|im_start|>assistant\n", ChatTemplate.ChatML.Format(Conversation));
        Assert.AreEqual("<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello.</s>\n<|user|>\nTell a story</s>\n<|assistant|>\n", ChatTemplate.Zephyr.Format(Conversation));
        Assert.AreEqual("Be brief.\nHi\nHello.\nTell a story", ChatTemplate.Plain.Format(Conversation));
        Assert.AreEqual("<|eot_id|>", ChatTemplate.Llama3.EndOfTurn);
        Assert.IsNull(ChatTemplate.Plain.EndOfTurn);
    }
}
